//! The one submit path both ingresses call: the gRPC one ([`grpc`], for the Envoy
//! filter) and the HTTP one ([`http`], for clients without Envoy). Whatever the door,
//! the same request gets the same answer.
//!
//! A request a filter rule took over (capture, fallback) is built from its rule's policy
//! and answered `202` with the receipt; a broadcast rule fans out ([`broadcast`]).
//! Otherwise, order of checks (Knocker 1.4.1): status URL; `X-Knocker` loop guard (406); header
//! `Knocker-Broadcast` (fan-out to a group); validation (400, every failing header at
//! once); commit, then the receipt (200).
//! A failure to commit is a 503 with `Retry-After`, never a receipt.

pub mod conn;
pub mod grpc;
pub mod http;

use std::sync::Arc;

use serde_json::json;
use tokio::sync::Notify;

use crate::broadcast::{self, agents::AgentBus, groups::Groups};
use crate::clock::Time;
use crate::config::file::GroupConfig;
use crate::config::Settings;
use crate::job::receipt::receipt;
use crate::job::rule::build_rule_job;
use crate::job::spec::{
    build_job, is_http_url, knocker_id, split_headers, Errors, Submission, BAD_URL,
};
use crate::job::{Job, VERSION};
use crate::store::{ClaimHealth, Inserted, Store, StoreError};

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

/// Knocker headers that set a job's policy: a broadcast uses its group's instead.
const BROADCAST_EXCLUDES: &[&str] = &[
    "knocker-host",
    "knocker-scheme",
    "knocker-timeout",
    "knocker-retries",
    "knocker-backoff-factor",
];

/// Most members a broadcast is looked up with.
const MAX_MEMBERS: usize = 10_000;

/// Seconds a client is asked to wait after a 503 from the store.
const RETRY_AFTER_S: &str = "1";

/// Everything the submit path needs.
pub struct Ingress {
    pub settings: Arc<Settings>,
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

impl Ingress {
    pub async fn submit(&self, submission: Submission) -> Reply {
        if let Some(reply) = refuse_unsafe(&submission) {
            return reply;
        }
        if let Some(rule) = &submission.rule {
            // A filter rule took the request over: no Knocker headers to read.
            let job = match build_rule_job(rule, &submission, self.time.now_ms(), new_id) {
                Ok(job) => job,
                Err(errors) => return Reply::json(400, &errors.to_json()),
            };
            return self.commit(job, 202).await;
        }
        if let Some(b) = &submission.broadcast_rule {
            return self
                .broadcast(&submission, &b.group, Some(&b.rule), 202)
                .await;
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
        let group = submission
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("knocker-broadcast"))
            .map(|(_, v)| String::from_utf8_lossy(v).trim().to_owned());
        if let Some(group) = group {
            return self.broadcast(&submission, &group, None, 200).await;
        }
        let now = self.time.now_ms();
        let job = match build_job(&self.settings, &submission, now, new_id) {
            Ok(job) => job,
            Err(errors) => return Reply::json(400, &errors.to_json()),
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
        let asked = receipt(&job);
        match self.store.insert(job).await {
            Ok(Inserted::Created(job)) => {
                self.wake.notify_one();
                tracing::debug!(job_id = %job.id, url = %job.request.url, "job accepted");
                Reply::json(status, &asked).with_header("knocker-id", job.id.clone())
            }
            Ok(Inserted::Existing(job)) => {
                Reply::json(status, &asked).with_header("knocker-id", job.id.clone())
            }
            Err(e) => {
                tracing::error!(error = %e, "submission refused: the store cannot commit");
                store_unavailable(&e)
            }
        }
    }

    /// Fans the request out to every member of `group`: one job per member, committed
    /// together, then the receipt listing them (`status` 200 for `Knocker-Broadcast`,
    /// 202 for a broadcast rule).
    async fn broadcast(
        &self,
        submission: &Submission,
        group: &str,
        rule: Option<&str>,
        status: u16,
    ) -> Reply {
        if broadcast::is_broadcast_copy(submission) {
            return Reply::text(
                406,
                "Ignore requests a broadcast delivered: they are never broadcast again",
            );
        }
        let field = if rule.is_some() {
            "rule.group"
        } else {
            "knocker-broadcast"
        };
        let (raw, _) = split_headers(&submission.headers);
        let mut errors = Errors::default();
        let Some(config) = self.groups.get(group) else {
            let known: Vec<&str> = self.groups.names().map(String::as_str).collect();
            errors.add(
                field,
                format!(
                    "Unknown group '{group}'. Groups: {}.",
                    if known.is_empty() {
                        "none configured (KNOCKER_CONFIG)".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
            return Reply::json(400, &errors.to_json());
        };
        for header in BROADCAST_EXCLUDES {
            if raw.contains_key(*header) {
                errors.add(
                    header,
                    "Cannot be combined with Knocker-Broadcast: the group's delivery policy applies.",
                );
            }
        }
        let callback = raw
            .get("knocker-callback")
            .map(|v| String::from_utf8_lossy(v).trim().to_owned());
        if callback.as_deref().is_some_and(|c| !is_http_url(c)) {
            errors.add("knocker-callback", BAD_URL);
        }
        let id = knocker_id(&raw, &mut errors);
        if !errors.0.is_empty() {
            return Reply::json(400, &errors.to_json());
        }
        let id = id.unwrap_or_else(new_id);
        if config.agents {
            return self
                .broadcast_to_agents(submission, group, config, &id, status)
                .await;
        }
        // A resubmission gets the stored broadcast's receipt, whatever the group is now.
        match self.stored_broadcast(&id).await {
            Ok(stored) if !stored.is_empty() => {
                // The members are the operator's; of the request, only what this one
                // carried is shown (see `commit`).
                let mut receipt = broadcast::receipt(&id, group, &stored);
                let copy = broadcast::copy_headers(group, config, submission);
                receipt["method"] = json!(submission.method);
                receipt["headers"] = json!(crate::job::receipt::header_list(&copy));
                receipt["body-length"] = json!(submission.body.len());
                return Reply::json(status, &receipt).with_header("knocker-id", id);
            }
            Ok(_) => {}
            Err(e) => return store_unavailable(&e),
        }
        let members = match self.groups.members(group).await {
            Ok(members) => members,
            Err(e) => {
                tracing::warn!(group, error = %e, "broadcast refused: no members to send to");
                return Reply::error(503, field, &format!("{e}. Nothing was accepted."))
                    .with_header("retry-after", RETRY_AFTER_S);
            }
        };
        let fanout = broadcast::Fanout {
            id: &id,
            group_name: group,
            group: config,
            members: &members,
            callback,
            rule,
        };
        if let Some(reply) = self.unclaimable() {
            return reply;
        }
        let jobs = broadcast::member_jobs(&fanout, submission, self.time.now_ms());
        match self.store.insert_all(jobs).await {
            Ok(inserted) => {
                self.wake.notify_one();
                let jobs: Vec<Job> = inserted
                    .into_iter()
                    .map(|i| match i {
                        Inserted::Created(job) | Inserted::Existing(job) => job,
                    })
                    .collect();
                tracing::debug!(broadcast_id = %id, group, members = jobs.len(), "broadcast accepted");
                Reply::json(status, &broadcast::receipt(&id, group, &jobs))
                    .with_header("knocker-id", id)
            }
            Err(e) => {
                tracing::error!(error = %e, "broadcast refused: the store cannot commit");
                store_unavailable(&e)
            }
        }
    }

    /// One message for every agent subscribed to `group`, now or later while they are
    /// subscribed; the receipt lists the agents subscribed now.
    async fn broadcast_to_agents(
        &self,
        submission: &Submission,
        group: &str,
        config: &GroupConfig,
        id: &str,
        status: u16,
    ) -> Reply {
        let Some(bus) = &self.agents else {
            return Reply::error(
                503,
                "knocker-broadcast",
                &format!("Group '{group}' is made of agents, which need KNOCKER_STORE=nats://…."),
            )
            .with_header("retry-after", RETRY_AFTER_S);
        };
        let headers = broadcast::copy_headers(group, config, submission);
        let message = broadcast::agents::Broadcast {
            id: id.to_owned(),
            group: group.to_owned(),
            method: submission.method.clone(),
            path: submission.absolute_path(),
            headers,
            body: submission.body.clone(),
        };
        match bus.publish(&message).await {
            Ok(sent) => Reply::json(status, &broadcast::agents_receipt(id, &message, &sent))
                .with_header("knocker-id", id.to_owned()),
            Err(e) => {
                tracing::error!(error = %e, "broadcast refused: NATS cannot take it");
                store_unavailable(&e)
            }
        }
    }

    /// A 503 while the store cannot hand out due jobs (a damaged database): a job taken
    /// now would wait for a repair, so the client is told to retry instead.
    fn unclaimable(&self) -> Option<Reply> {
        let why = self.claims.failing()?;
        Some(store_unavailable(&StoreError::Unavailable(format!(
            "the store cannot hand out jobs ({why})"
        ))))
    }

    /// The member jobs of broadcast `id`, in member order (empty when there is none).
    pub async fn stored_broadcast(&self, id: &str) -> Result<Vec<Job>, StoreError> {
        let jobs = self
            .store
            .find_prefix(&broadcast::member_prefix(id), MAX_MEMBERS)
            .await?;
        Ok(jobs
            .into_iter()
            .filter(|j| {
                j.config
                    .get("broadcast")
                    .and_then(|b| b.get("id"))
                    .is_some_and(|b| b == id)
            })
            .collect())
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

/// A request whose method, path or headers hold what must never be stored or forwarded
/// (control characters, names that are not HTTP tokens): a 400 naming the field.
fn refuse_unsafe(submission: &Submission) -> Option<Reply> {
    if let Some((field, why)) = crate::job::spec::unsafe_header(&submission.headers) {
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

fn store_unavailable(e: &StoreError) -> Reply {
    Reply::error(
        503,
        "store",
        &format!("{e}. Nothing was accepted; retry later."),
    )
    .with_header("retry-after", RETRY_AFTER_S)
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

    fn ingress() -> Ingress {
        Ingress {
            settings: Arc::new(Settings::defaults()),
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
